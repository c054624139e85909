"""Small experiments that train an attnkit model on a CPU and show what its attention does.

- :mod:`attnkit.demos.translate`: a tiny English→French translator whose cross-attention
  looks at the word that disambiguates "bank" (``attnkit translate-demo``).
"""
