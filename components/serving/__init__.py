"""The pyfunc models (a classifier, an ensemble), predicting with them, their metrics and cost.

Never imports tracking or steps: a logged model carries this code and loads without them.
"""
