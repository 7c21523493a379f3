"""HTTP edge workers: processes that serve the public port and hand checked webhooks to the
service over a private link (see worker.py and link.py; workers.py starts and watches them)."""
