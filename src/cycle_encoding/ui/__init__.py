"""The browser editor: ``cycle-encoding ui`` (a Gradio page over ``editing.editor.Editor``; needs the ``ui`` extra)."""
