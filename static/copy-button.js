
// d2l-face: d2lbook's copy buttons load their icon from raw.githubusercontent.com,
// which a reader without internet (or behind a firewall) sees as a broken
// image. Swap in an icon drawn inline: two overlapping sheets of paper.
// The leading semicolon: d2l.js ends in `var tagClick = function ...}`
// without one, and a bare `(` would call that function.
;(function () {
  const remoteIcon = 'sphinx-copybutton/master/sphinx_copybutton/_static/copy-button.svg'
  const localIcon = 'data:image/svg+xml,' + encodeURIComponent(
    '<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24" viewBox="0 0 24 24" ' +
    'fill="none" stroke="#44546a" stroke-width="1.6" stroke-linejoin="round">' +
    '<rect x="8.5" y="7.5" width="11" height="13" rx="1.5"/>' +
    '<path d="M15.5 7.5V5a1.5 1.5 0 0 0-1.5-1.5H6A1.5 1.5 0 0 0 4.5 5v11' +
    'A1.5 1.5 0 0 0 6 17.5h2.5"/></svg>')
  const swapIcons = () => {
    document.querySelectorAll('a.copybtn img').forEach(img => {
      if ((img.getAttribute('src') || '').endsWith(remoteIcon)) img.setAttribute('src', localIcon)
    })
  }
  const watch = () => {
    swapIcons()
    new MutationObserver(swapIcons)
      .observe(document.body, {childList: true, subtree: true})
  }
  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', watch)
  } else {
    watch()
  }
})()
