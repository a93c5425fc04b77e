"""Command-line entry points (argparse + main() only) that python -m lmm routes to; nothing in the
library imports them.
"""
