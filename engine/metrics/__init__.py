"""Counters: per-day service metrics in Redis (`daily`) and Prometheus (`prometheus`)."""
