import { LabIcon } from '@jupyterlab/ui-components';

/** Parties around a coordinator. */
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <circle cx="12" cy="12" r="3.2"/>
    <circle cx="4" cy="5" r="2.2"/><circle cx="20" cy="5" r="2.2"/>
    <circle cx="4" cy="19" r="2.2"/><circle cx="20" cy="19" r="2.2"/>
  </g>
  <g class="jp-icon3" stroke="#616161" stroke-width="1.4" fill="none">
    <path d="M5.6 6.4 9.6 10M18.4 6.4 14.4 10M5.6 17.6 9.6 14M18.4 17.6 14.4 14"/>
  </g>
</svg>`;

export const federationIcon = new LabIcon({ name: 'fednb:federation', svgstr: svg });
