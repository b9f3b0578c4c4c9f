"""
Train with CHORD, for `python recipes/chord.py ...` and `accelerate launch recipes/chord.py ...` from a checkout: the
same program as the installed `trl-chord` command (see `trl_chord/recipes/chord.py` for the options).

    python recipes/chord.py --config demo
    accelerate launch --config_file trl_chord/recipes/accelerate/zero3.yaml recipes/chord.py --config math_chord_phi
"""

from trl_chord.cli import main


if __name__ == "__main__":
    main()
