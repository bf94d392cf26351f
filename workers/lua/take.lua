-- take: move one message from the first non-empty queue list into kombu's unacked index, in one
-- step (workers.take.Taker, for workers.transport.Channel).
--
-- kombu's BRPOP removes a message from its queue in one round trip and records it as
-- unacknowledged in a second. A BRPOP applied by Redis whose reply never reached the worker
-- (Redis shut down or was killed between the two, a failover, a dropped connection) lost the
-- message for good. Here the message is recorded where kombu's own recovery (restore_visible,
-- after the visibility timeout) finds it in the same step that removes it from its queue.
--
-- KEYS[1] kombu's unacked hash, KEYS[2] kombu's unacked index (a sorted set), KEYS[3..] the queue
-- lists in the order to try (highest priority first, as kombu's BRPOP names them).
-- ARGV[1] now, in seconds since the epoch (the index's score, which kombu compares with its
-- visibility timeout); ARGV[2] one character per queue list, '1' where its consumer acknowledges
-- (record what is taken), '0' where it does not (no_ack, e.g. Celery's remote-control replies:
-- a record would never be acknowledged and would come back after the visibility timeout).
--
-- Returns nil when every list is empty, else {list key, item, recorded}: recorded is 1 when the
-- item was recorded under its delivery tag exactly as kombu's QoS.append records it (JSON
-- [payload, exchange, routing_key], the payload's text kept byte for byte), 0 when the item is
-- no message kombu could record (the worker sets it aside). RPOP is the script's first write, so
-- a server at maxmemory (noeviction) still lets a worker drain it (the later writes are allowed
-- once the script has written).
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item and string.sub(ARGV[2], i - 2, i - 2) ~= '1' then return {KEYS[i], item, 0} end
  if item then
    local ok, message = pcall(cjson.decode, item)
    local properties = ok and type(message) == 'table' and message.properties
    if type(properties) == 'table' and type(properties.delivery_tag) == 'string'
        and type(properties.delivery_info) == 'table' then
      local exchange, routing_key = properties.delivery_info.exchange, properties.delivery_info.routing_key
      if type(exchange) == 'string' and type(routing_key) == 'string' then
        local tag = properties.delivery_tag
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
        return {KEYS[i], item, 1}
      end
    end
    return {KEYS[i], item, 0}
  end
end
return nil
