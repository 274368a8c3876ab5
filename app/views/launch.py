"""Launch: start a run (model, task, method, parameters) as a background `workbench run` process
writing to the store (see `app.launcher`); this page follows its progress and lists it when it
finishes. The job file stays under `<store>/jobs/`, so a launched run can be rerun from the CLI."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import common
from app.launcher import job_status, job_text, launch, validate
from workbench.errors import WorkbenchError
from workbench.methods import all_methods
from workbench.tasks import TASKS

store = common.store()
root = Path(store.root)
st.title("Launch a run")
methods = all_methods()
with st.form("launch"):
    model = st.text_input("Model (registry name, local directory or hub name)", value=st.query_params.get("model", "smollm2-135m"))
    c1, c2 = st.columns(2)
    task = c1.selectbox("Task", sorted(TASKS), index=sorted(TASKS).index("ioi"))
    method = c2.selectbox("Method", list(methods), index=list(methods).index("logit_diff"),
                          format_func=lambda m: f"{m} - {methods[m].description[:60]}")
    task_params = c1.text_area("Task parameters (TOML lines)", value="n_prompts = 8", height=100)
    params = c2.text_area("Method parameters (TOML lines)", value="", height=100)
    go = st.form_submit_button("Start", type="primary")

if go:
    text = job_text(model, task, task_params, method, params)
    try:
        validate(text)
    except WorkbenchError as e:
        st.error(str(e))
    else:
        job = launch(store, text)
        st.success(f"started {job.name}; the Jobs page follows it unit by unit")


@st.fragment(run_every=2)
def jobs_panel() -> None:
    jobs = store.job_files()
    if not jobs:
        st.caption("No runs launched from here yet.")
        return
    st.subheader("Launched runs")
    for job in jobs[:10]:
        status, last = job_status(job)
        icon = {"done": ":material/check_circle:", "failed": ":material/error:", "running": ":material/progress_activity:",
                "interrupted": ":material/cancel:"}[status]
        with st.expander(f"{job.stem}: {status}", icon=icon, expanded=status == "running"):
            st.code(job.read_text(), language="toml")
            st.text(last[-300:])
    running = common.catalog(str(root))
    running = running[running["status"] == "running"] if not running.empty else running
    if not running.empty:
        st.dataframe(running[["run_id", "model", "task", "method", "status"]], hide_index=True)


jobs_panel()
