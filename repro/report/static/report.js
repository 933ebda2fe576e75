// repro report: click a column header of a table.sortable to sort its rows (again to reverse). A cell's
// data-sort value orders it where the cell has one (numbers as numbers), else its text.
"use strict";

function sortKey(row, column) {
  const cell = row.cells[column];
  if (!cell) return "";
  const value = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
  const number = Number(value);
  return value !== "" && !Number.isNaN(number) ? number : value;
}

function compareKeys(a, b) {
  if (typeof a === "number" && typeof b === "number") return a - b;
  if (typeof a === "number") return -1;  // numbers before text
  if (typeof b === "number") return 1;
  return a.localeCompare(b, undefined, { numeric: true });
}

function sortTable(table, header) {
  const column = header.cellIndex;
  const ascending = header.getAttribute("aria-sort") !== "ascending";
  for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
  header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => (ascending ? 1 : -1) * compareKeys(sortKey(a, column), sortKey(b, column)));
  body.append(...rows);
}

for (const table of document.querySelectorAll("table.sortable")) {
  for (const header of table.tHead.rows[0].cells) {
    header.title = "sort by " + header.textContent.trim();
    header.addEventListener("click", () => sortTable(table, header));
  }
}
