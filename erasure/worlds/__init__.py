"""The models this project builds itself (``builtin:<name>``): the toy worlds and the tiny test
pipeline, each with its judge, in one registry."""
