"""Words of the grid environments (Sokoban, FrozenLake, Sudoku): symbols, actions, env-specific words."""

SYMBOLS = ("#", "_", "O", "X", "√", "P", "S", "G", ".")

ACTIONS = ("Up", "Down", "Left", "Right")

ENV_WORDS = (
    "box",
    "boxes",
    "target",
    "targets",
    "player",
    "room",
    "sokoban",
    "frozen",
    "lake",
    "hole",
    "holes",
    "ice",
    "slippery",
    "slip",
    "sudoku",
    "grid",
    "digit",
    "digits",
    "puzzle",
    "fill",
    "block",
    "subgrid",
    "given",
    "givens",
)

WORDS = SYMBOLS + ACTIONS + ENV_WORDS
