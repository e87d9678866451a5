"""The Streamlit dashboard over the Mongo mirror (`cnnflow dashboard`); it reads Mongo only."""
