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
NAMESPACE_GRADS = 10_000  # namespace tensors whose .grad an input from outside the cell is looked up in
NOTEBOOK_RECORDS = 20_000  # records of earlier traced cells kept for later cells' backward; oldest cells go first

# ---- re-run snapshots across the notebook (notebook/session.py, issue 14) ----
# One budget for every traced cell's snapshot together (`%config AutogradMagics.snapshot_mb`): a new
# snapshot releases the least recently used ones to fit; what still does not fit is not copied but
# checked by version counter when a variant runs (the toggles go off if the real run changed it).
NOTEBOOK_SNAPSHOT_BYTES = SNAPSHOT_BYTES

# ---- the static snapshot's size (render/snapshot.py, html.py, teach_html.py, text.py) ----
# Each traced cell writes its snapshot (text/html + text/plain) into the notebook file: these
# keep it under ~150 KB whatever the model (a seed cell far less); every cut says so in a line.
SNAPSHOT_HTML_BYTES = 120_000  # the whole text/html; past it, the last sections give way to a line
SNAPSHOT_TABLE_BYTES = 56_000  # the table of tensors: rows stop here ("N more tensors ...")
SNAPSHOT_GRAPH_BYTES = 8_000  # the graph's SVG (compacted); larger, it is redrawn with fewer nodes
SNAPSHOT_GRAPH_SMALL = 10  # nodes in that smaller drawing (start and end kept, the middle folded)
SNAPSHOT_GRAPH_SMALL_BYTES = 16_000  # that smaller drawing's SVG; larger still, the graph is left out (one line says so)
SNAPSHOT_DOT_CHARS = 8_000  # DOT text shown when no SVG could be laid out
SNAPSHOT_STEPS_SHOWN = 6  # first backward steps shown per pass
SNAPSHOT_PASSES = 4  # backward passes shown step by step (the rest are listed)
SNAPSHOT_STEPPER_BYTES = 24_000  # the stepper section
SNAPSHOT_WHY = 8  # tensors with a why-explanation
SNAPSHOT_WHY_BYTES = 12_000  # the why section
SNAPSHOT_CALL_ROWS = 8  # ops inside one call listed (the rest are counted)
SNAPSHOT_REPEAT_BLOCKS = 1  # of N identical numbered blocks (layers.0 … layers.5), those listed
SNAPSHOT_VALUE_LINES = 6  # a printed value up to this many lines is shown whole ...
SNAPSHOT_VALUE_CHARS = 360  # ... and up to this many characters; else its head and statistics
SNAPSHOT_VALUE_HEAD = 2  # lines of that head
SNAPSHOT_TEXT_CHARS = 1_000  # characters of any one message (errors, notes) in the snapshot
TEXT_ROWS = 300  # rows of the text table (text/plain, str(trace)); the rest are counted
SNAPSHOT_PASS_ITEMS = 20  # backward passes listed (a training loop makes hundreds)
SNAPSHOT_WHY_UNNAMED = 2  # of those, unnamed intermediates (their why mostly repeats "a non-leaf keeps no .grad")

# ---- the live view's first screen (notebook/widget.py, render/payload.py) ----
# The widget's synced state (what a saved notebook keeps) carries what the first screen shows;
# the page asks for the rest over the widget's comm: more rows, more steps, the graph's SVG.
WIDGET_FIRST_ROWS = 300  # table rows in the first payload; "show more" asks for this many at a time
WIDGET_FIRST_STEPS = 20  # backward steps per pass in the first payload; the stepper asks for the rest
WIDGET_STATE_BYTES = 300_000  # the goal for one view's synced state, JSON (tests/test_widget_latency.py)

# ---- trace speed (issue 14) ----
# A non-contiguous float tensor up to this many bytes is copied compact once for its
# statistics (then summed in vector loops); a larger one is reduced in place, in
# float64 buffers, so no preview ever allocates more than this beside the tensor.
PREVIEW_COPY_BYTES = 16 << 20
# Device (CUDA) tensors' previews are reduced on the device and queued; the queue is
# copied to the host in one transfer when it holds this many, and when the run ends.
PREVIEW_QUEUE = 256

# ---- the explorer (variants/explore.py, issue 15) ----
EXPLORE_CURVE_SECONDS = 0.5  # point-by-point re-runs for one curve when a batched run is not possible (coarse to fine; fewer points said). It runs as the cell ends: a heavy cell's curve is coarser, never seconds late
JACOBIAN_MAX_ENTRIES = 1024  # entries (output numel × input numel) of a Jacobian computed; larger ones are said too big

# ---- the explorer's views (render/explore.py, notebook/widget.py, issue 15) ----
EXPLORE_SNAPSHOT_BYTES = 6_000  # the snapshot's explore section; past it, the Jacobian then curves give way to a line
EXPLORE_JACOBIAN_SHOWN = 8  # rows and columns of a Jacobian shown (the rest: "…" and its shape)
EXPLORE_VECTOR_SHOWN = 8  # entries of v, v·J and .grad shown
EXPLORE_VALUE_BOUND = 1e6  # a value from the page's slider or number box beyond this is refused

# ---- debugging a training cell: NaN/Inf origin and gradient flow (explain/debug.py, render/debug.py, issue 16) ----
DEBUG_INPUTS = 4  # inputs of the first non-finite op listed with their statistics
DEBUG_FLOW_BARS = 40  # bars in the gradient-flow chart: past it one bar per module, then the first and last ones
DEBUG_FLOW_BYTES = 12_000  # the chart's SVG; past it fewer bars are drawn
DEBUG_PASSES = 3  # backward passes whose first non-finite gradient the banner names (the rest are counted)
DEBUG_FLOW_PASSES = 4  # the last backward passes whose gradient flow the widget can switch between
DEBUG_FLOW_EARLIER_BYTES = 12_000  # the snapshot's drawings of those passes before the last (folded): past it, fewer

# ---- debugging a training loop past --limit (capture/finite.py, render/debug.py, issue 16, second landing) ----
FINITE_WINDOW = 4_096  # ops past --limit kept for the NaN/Inf search between two backward calls; past it they are checked at once
FINITE_WINDOW_BYTES = 64 << 20  # ... and the bytes of their outputs the window may keep alive (an inference loop has no backward call)
TRAIN_ITERATIONS = 10_000  # backward calls whose loss and gradient norm are kept; later ones are counted
DEBUG_CHART_POINTS = 300  # points per line of the training chart; more iterations are sampled (non-finite ones kept)
DEBUG_CHART_BYTES = 9_000  # the training chart's SVG; past it fewer points are drawn
