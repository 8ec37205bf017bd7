"""sciml's built-in domain plugins. Each folder is self-contained (data, model, generator, conf) and registers
through the `sciml.plugins` entry-point group, exactly as a third-party plugin does."""
