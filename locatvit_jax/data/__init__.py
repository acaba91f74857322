"""Input pipelines: random-access data sources, per-example transforms, Grain loaders."""
