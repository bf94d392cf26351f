"""Demo tasks. Users add their own modules through ``TASK_MODULES``."""
