"""
The data of the paper configs, made from the public datasets: `trl-chord prepare NAME [options]` runs
`trl_chord.recipes.prepare.NAME.main` (`trl-chord prepare NAME --help` for its options).
"""

# Each preparer's module name and what it makes, listed without importing it (they import `datasets`)
PREPARERS = {
    "openr1_math": "OpenR1-Math-220k -> expert solutions and RL prompts (math_chord_mu, math_chord_phi, _lora)",
    "toolace": "ToolACE -> expert conversations and RL prompts with reference calls (tool_chord_phi)",
    "geometry3k": "Geometry3K and expert solutions -> RL prompts and experts with their images (geometry_vlm_chord)",
}
