"""The Streamlit dashboard; it reads the store and never needs a model for stored views."""
