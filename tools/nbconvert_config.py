# `make demo`: the HTML export shows each view's static snapshot. Offline, the
# widget-view output would need require.js and a widget manager from a CDN
# and render blank; the snapshot is in the same mimebundle, so prefer it.
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
