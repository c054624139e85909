"""Bridges to other libraries. Each submodule imports its library only when it is imported.

- :mod:`attnkit.integrations.transformers`: Hugging Face models run their attention on
  :func:`attnkit.attention` with ``attn_implementation="attnkit"``.
- :mod:`attnkit.integrations.tap`: one tap on the attention calls of attnkit modules and of
  Hugging Face models (whatever implementation they run), which capture, the profile and the
  monitor ride on.
"""
