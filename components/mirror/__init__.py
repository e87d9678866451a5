"""The MLflow -> MongoDB mirror and the Streamlit dashboard that reads it."""
