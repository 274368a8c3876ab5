"""The dashboard: `workbench dashboard` (or the end of `workbench demo`) serves this file with
WORKBENCH_HOME set to the store. Pages live in `app/views/` (not `pages/`, which Streamlit would also auto-register); each reads the store and computes
only when asked to (and then stores what it computed)."""

from __future__ import annotations

import streamlit as st

from app.common import PAGES

st.set_page_config(page_title="Workbench", layout="wide")
pages = [st.Page(script, title=title, url_path=path, default=(path == "runs")) for path, (script, title) in PAGES.items()]
st.navigation(pages).run()
