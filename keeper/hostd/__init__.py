"""The host agent (`keeper hostd`): Dom0 of one host — places and moves Domain Rs."""
