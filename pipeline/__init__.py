"""What every stage shares: config, artifact store, refs, packaged assets, the CLI."""
