// Keyboard shortcuts on the task page: 1-4 / 6-9 pick a point on the scale, Enter submits,
// Ctrl+Enter submits from inside the note, N jumps to the note.
document.addEventListener("keydown", (event) => {
  const form = document.getElementById("label-form");
  if (!form || event.altKey || event.metaKey) return;
  const target = event.target;
  const typing = target && (target.tagName === "TEXTAREA" || target.tagName === "SELECT" || (target.tagName === "INPUT" && target.type !== "radio"));
  if (typing) {
    if (event.key === "Enter" && event.ctrlKey) { event.preventDefault(); form.requestSubmit(); }
    return;
  }
  if (event.ctrlKey) return;
  if (/^[1-9]$/.test(event.key) && event.key !== "5") {
    const point = document.getElementById("confidence-" + event.key);
    point.checked = true;
    point.focus();
    event.preventDefault();
  } else if (event.key === "Enter") {
    event.preventDefault();
    form.requestSubmit();
  } else if (event.key === "n" || event.key === "N") {
    event.preventDefault();
    document.getElementById("note").focus();
  }
});
