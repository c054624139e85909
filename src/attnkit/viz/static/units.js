/* attnkit pages: sizes as people read them, the twin of attnkit/_format.py's size() (a browser test holds the
 * two to the same strings). AttnkitUnits.bytes(512) -> "512 B", bytes(123456789) -> "118 MiB". */
(function () {
  "use strict";
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

  function bytes(n) {
    let u = 0;
    while (Math.abs(n) >= 1023.5 && u < UNITS.length - 1) { n /= 1024; u++; }  // never "1024 KiB"
    if (u === 0) return `${Math.round(n)} B`;
    const digits = Math.abs(n) >= 100 ? 0 : Math.abs(n) >= 10 ? 1 : 2;
    return `${Number(n.toFixed(digits))} ${UNITS[u]}`;  // Number(): no trailing zeros, as size() writes
  }

  window.AttnkitUnits = { bytes };
})();
