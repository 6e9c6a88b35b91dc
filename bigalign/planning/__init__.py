"""Planning: which rows go to which task and checkpoint unit, memory per task, and the
options objects. Pure functions over shapes and frozen dataclasses.
"""
