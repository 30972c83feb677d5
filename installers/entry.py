"""PyInstaller's entry script for `meshagent` (installers/meshagent.spec).

It lives outside the package on purpose: an entry script inside meshagent_gui/ would make
PyInstaller analyse the source tree, while this one takes meshagent_gui from the build
environment, the same installed package (and package data) that pip built.
"""

from meshagent_gui.cli import main

raise SystemExit(main())
