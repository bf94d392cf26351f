"""Code both sides of chronoq import: settings, logging, names, Redis, the Celery app factory."""
