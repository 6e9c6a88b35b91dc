"""Commands: the Python face of every job (fit, apply, import, export, evaluate,
curve, realign, sample, transforms at query time); each is a plan + job + graph.
"""
