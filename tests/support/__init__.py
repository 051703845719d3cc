"""What the tests share besides fixtures: helpers, profiles, models, plugins and studies.

``tests/conftest.py`` holds only fixtures and pytest hooks (it imports what it needs from
here); test modules import from here, never from a conftest or from another test module
(``tests/test_layout.py`` enforces both). The model families of the conformance matrix and
the ``--task`` plugins beyond classification stay in ``tests/families.py``, which plugin
specs (``tests.families:make_series_task``) and the docs name.
"""
