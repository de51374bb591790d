"""Local stand-ins for the services the aggregator talks to, on 127.0.0.1."""
