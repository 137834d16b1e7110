"""Analysis: the closed forms of the paper's theory and the two-disc SVM experiment."""
