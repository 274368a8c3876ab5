"""Jobs: every job recorded in the store (`workbench run`, local or on Ray, from the CLI or the
Launch page), live: units per state, each unit's state, node, attempts and own progress, failed
units with their messages, and the circuits the job scored (CPR / CMD per discovery method)."""

from __future__ import annotations

import streamlit as st

from app import data
from app.common import store as open_store
from app.figures import sweep_figure

store = open_store()
st.title("Jobs")


@st.fragment(run_every=2)
def jobs_view() -> None:
    records = {r["job_id"]: r for r in store.job_records()}
    if not records:
        st.info(f"No jobs in `{store.root}` yet: `workbench run JOB.toml` (add `--executor ray` for a Ray cluster) "
                "or the Launch page starts one.")
        return
    table = data.job_table(list(records.values()))
    ids = list(table["job_id"])
    wanted = st.query_params.get("job")
    job_id = st.selectbox("Job", ids, index=ids.index(wanted) if wanted in ids else 0, key="job",
                          format_func=lambda j: f"{j}  ({table.set_index('job_id').loc[j, 'state']}, "
                                                f"{records[j]['executor']}, {records[j]['file']})")
    st.query_params["job"] = job_id
    record = records[job_id]
    row = table.set_index("job_id").loc[job_id]
    finished = int(row["done"] + row["skipped"] + row["failed"])
    st.progress(finished / max(int(row["units"]), 1),
                text=f"{finished} of {row['units']} units finished: {row['state']}"
                     + (f" on Ray at {record['address']}" if record.get("address") else f", {record['executor']}"))
    cols = st.columns(5)
    for col, state in zip(cols, ("done", "skipped", "failed", "running", "pending")):
        col.metric({"done": "computed", "skipped": "already stored"}.get(state, state), int(row[state]))
    units = data.job_units(record)
    for failed in units[units["state"] == "failed"].itertuples():
        st.error(f"unit {failed.unit} ({failed.unit_label}): {failed.message}")
    st.dataframe(units, hide_index=True, width="stretch",
                 column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0),
                                "unit_label": st.column_config.TextColumn("unit", width="large")})
    circuits = data.job_circuits(store, record)
    if not circuits.empty:
        st.subheader("Circuits")
        st.plotly_chart(sweep_figure(circuits), width="stretch")
        st.dataframe(circuits, hide_index=True, width="stretch")
        st.caption("Open a discovery run's circuit on the Circuit page (pick its task and the run).")
    with st.expander("Job file"):
        st.code(record["text"], language="toml")


jobs_view()
