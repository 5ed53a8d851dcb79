"""Pods as separate hosts: the service on a topology of Linux network namespaces.

`python -m deploy.topology test` builds, on one machine, what a deployment looks like to the
service: a Redis host, a host for the sandbox upstreams, two API pods, two worker pods and a
load driver, each a network namespace with its own address on one bridge (netns.py). It
starts the real `prefetch` roles in them (pods.py), drives reads, schedules and activity
through the API pods the way a Kubernetes Service routes (driver.py), runs the scenarios
(scenarios.py: a rolling restart, the leader's pod killed, a worker pod and an API pod cut
off from Redis), audits what Redis holds (audit.py) and reports (report.py). Needs root and
iproute2 alone; fails, never skips, without them.
"""
