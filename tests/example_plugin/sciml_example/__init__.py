from pathlib import Path

from sciml.plugins import Plugin

plugin = Plugin(name="example", config_dir=Path(__file__).parent / "conf",
                description="minimal third-party plugin (tests/example_plugin)")
