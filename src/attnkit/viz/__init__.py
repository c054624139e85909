"""Pictures of attention: the HTML explorer and report, the attention lab, PNG heatmaps."""
