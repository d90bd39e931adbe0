"""Per-family results shared by the family test modules; tests/test_families_table.py (run after them,
in file order) writes them to $EF_FAMILY_REPORT and checks the model table of docs/families.md against them."""

RESULTS: dict = {}  # arch -> {"facts": {...}, "float32": {...}, "float64": {...}, "scan": ..., "interfaces": ...}
PAPER_RESULTS: dict = {}  # arch -> {"fig1_2": status, "fig3": ..., "fig4": ..., "fig5": ..., "fig8": ...}
