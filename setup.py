"""Package discovery for the mapped folders of pyproject.toml (setuptools cannot find mapped packages itself)."""
from setuptools import find_packages, setup


def under(name: str, folder: str) -> list[str]:
    return [name] + [f"{name}.{p}" for p in find_packages(folder)]


setup(packages=under("sciml", "sciml") + ["sciml.conf"] + under("sciml_plugins", "plugins"))
