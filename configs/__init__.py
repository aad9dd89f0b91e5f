"""The configs slidecache ships (extract/, train/, cohorts/ YAML files), installed as package data so that a
wheel install finds them through importlib.resources: `slidecache.configs.SHIPPED` is their one locator."""
