"""Reports, plots and summaries of run directories: numpy, pyarrow and matplotlib only (never torch
or Ray). ``commands.py`` is ``raysens report|show|compare``; ``content.py`` builds a report's
content, ``render.py`` writes it as HTML/Markdown; ``plots.py`` draws PNGs with the helpers of
``plot_parts.py``; ``analysis.py`` holds the numbers they all show; ``decay.py`` fits the decay law
G(r) = γ + β (r+1)^(−p) per layer (``decay_plot.py`` draws it) and ``precision.py`` says how many
samples a target relative standard error needs; ``differences.py`` summarises a paired run (changed cells
at the run's FDR, paired vs unpaired SE, Δp) and ``paired.py`` reads, prints and draws it.
"""

# ``differences`` is the module ``differences.py`` (paired runs); the unpaired helper of ``raysens compare`` is
# ``raysens.report.commands.differences``
_COMMANDS = ("main_report", "main_show", "main_compare")


def __getattr__(name):
    if name in _COMMANDS:
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'raysens.report' has no attribute {name!r}")
