"""The chronoq scheduler: job specs, triggers and the daemon that dispatches fires to Celery."""
