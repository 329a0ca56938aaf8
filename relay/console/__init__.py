"""The web console at /console: backlog, deliveries and a job's story, for the people on call."""
