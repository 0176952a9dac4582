"""The applications built on widenets: the demo, the lazy-training experiment (with their
reports and figures) and the ``widenets`` command line.

The library never imports this package (a test checks it); it depends only on the
library's public modules.
"""
