"""FlowMason pipeline engine: documents, templates, expressions, executor, components."""
