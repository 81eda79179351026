"""The reliability domain: latency sketches and percentiles, spike detection and attribution."""
