"""Every bound the package puts on work and size, in one place.

A teaching tool must stay quick on a real model: each limit here caps what
one traced cell may cost (time, memory, bytes in the notebook) and every view
says when it was reached ("+N more", "not recorded", "folded"). Modules read
these by name; change one here and every view follows.
"""

# ---- recording (capture/) ----
DETAIL_LIMIT = 3  # runs of one expression in a loop kept in full detail (`--limit`); the rest are counted
PREVIEW_FULL = 64  # tensors up to this many elements are copied whole into a preview
PREVIEW_EDGE = 3  # edge items per dimension for larger tensors, as torch prints them
PREVIEW_EDGE_BLOCK = 512  # largest summarized block kept before falling back to a flat head
STATS_ELEMENTS = 50_000_000  # above this, exact statistics cost too much per op: the preview says so
PASS_NODES = 2000  # a backward pass with more nodes keeps its records' gradients but not its steps
PASS_WALK = 200_000  # autograd nodes visited at most to find the records' nodes

# ---- re-runs (variants/) ----
SNAPSHOT_BYTES = 64 * 2**20  # copies one snapshot keeps; larger objects are copied from the post-run state
SNAPSHOT_SCAN = 20_000  # objects visited when looking for tensors inside one value
SNAPSHOT_GRAPH = 20_000  # autograd nodes walked to find the leaves a shared tensor's graph reaches
CHECK_LEAVES = 10  # leaves the gradient check checks
CHECK_ELEMENTS = 8  # elements sampled per leaf
CHECK_SECONDS = 20.0  # nudged re-runs per cell; fewer elements are sampled for slow cells
CHECK_REFERENCE_LIMIT = 1000  # loop runs per expression the check's reference re-run records

# ---- views (render/) ----
GRAPH_NODES = 300  # nodes in a drawing; the rest fold into "more"
LAYOUT_SECONDS = 5.0  # Graphviz layout time before the DOT text is shown instead
WIDGET_ROWS = 1500  # table rows sent to the widget
WIDGET_ROWS_PER_CALL = 12  # rows of ops inside one call sent unfolded (the rest are counted)
WIDGET_STEPS = 400  # backward steps sent per pass
WIDGET_TEXT = 400  # characters of any free text sent (explanations, messages)
SNAPSHOT_ROWS = 400  # rows in the static snapshot (a notebook file should stay small)
SNAPSHOT_STEPS = 200  # backward steps in the static snapshot per pass
SNAPSHOT_EXPLAINED = 300  # records with why-explanations in the static snapshot

# ---- the notebook (notebook/) ----
NOTEBOOK_RECORDS = 20_000  # records of earlier traced cells kept for later cells' backward; oldest cells go first

# ---- trace speed (issue 14) ----
# A non-contiguous float tensor up to this many bytes is copied compact once for its
# statistics (then summed in vector loops); a larger one is reduced in place, in
# float64 buffers, so no preview ever allocates more than this beside the tensor.
PREVIEW_COPY_BYTES = 16 << 20
# Device (CUDA) tensors' previews are reduced on the device and queued; the queue is
# copied to the host in one transfer when it holds this many, and when the run ends.
PREVIEW_QUEUE = 256
