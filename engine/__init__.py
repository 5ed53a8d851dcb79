"""The engine: settings, Redis store, upstream clients, the job broker and the supervisor."""
