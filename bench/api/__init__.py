"""The usage-query, GraphQL and publish-to-visible benchmark (``python -m bench.graphql_bench``), one module per
scenario on top of ``bench.harness``."""
