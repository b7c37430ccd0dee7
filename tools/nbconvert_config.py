# `make demo`: the HTML export shows each view's static snapshot. A traced cell
# publishes two outputs: the widget (widget-view JSON and an empty text/plain)
# and the snapshot (text/html). Offline, the widget-view output would need
# require.js and a widget manager from a CDN and renders blank; the snapshot
# output next to it is what shows. text/html first keeps other outputs' HTML.
c = get_config()  # noqa: F821 - provided by traitlets when loading a config file
c.NbConvertBase.display_data_priority = [
    "text/html",
    "application/vnd.jupyter.widget-view+json",
    "application/javascript",
    "text/markdown",
    "image/svg+xml",
    "text/latex",
    "image/png",
    "image/jpeg",
    "text/plain",
]
