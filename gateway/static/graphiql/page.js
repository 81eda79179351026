// The gateway's GraphiQL page (not vendored: this project's code). Loaded from 'self' after React, ReactDOM
// and GraphiQL's UMD builds, so the Content-Security-Policy needs no inline script.
//
// Every endpoint but the health ones needs a bearer token, so the page asks for one first: the Headers editor
// starts with {"Authorization": "Bearer <token>"} and the command that makes one, and until the headers hold
// something shaped like a JWT the schema is not fetched (no 401, no "Error fetching schema") and a run answers
// with what to do instead. Once a token is there the schema loads; subscriptions go over the WebSocket
// (graphql-transport-ws), the headers editor's content becoming the connection_init payload, which is where
// the gateway reads the token.
"use strict";

(function () {
  const root = document.getElementById("graphiql");
  const tokenCommand = root.dataset.tokenCommand;
  const httpUrl = window.location.origin + window.location.pathname;
  const wsUrl = httpUrl.replace(/^http/, "ws");
  const JWT = /^Bearer\s+[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;
  const PLACEHOLDER = "<token from " + tokenCommand + ">";
  const DEFAULT_HEADERS = JSON.stringify({ Authorization: "Bearer " + PLACEHOLDER }, null, 2);
  const NO_TOKEN =
    "No token yet: the Headers tab below must read {\"Authorization\": \"Bearer <token>\"} (valid JSON, the " +
    "word Bearer, then the token). Make a token in a terminal with  " + tokenCommand + "  . " +
    "The schema (Docs, completion) loads as soon as a token is there.";

  function tokenOf(headersText) {
    let headers;
    try {
      headers = JSON.parse(headersText || "{}");
    } catch (_) {
      return null;
    }
    if (headers === null || typeof headers !== "object") return null;
    for (const key of Object.keys(headers)) {
      const value = headers[key];
      if (key.toLowerCase() === "authorization" && typeof value === "string" && JWT.test(value.trim())) {
        return value.trim();
      }
    }
    return null;
  }

  function storedHeaders() {
    try {
      return window.localStorage.getItem("graphiql:headers");
    } catch (_) {
      return null;
    }
  }

  const upstream = GraphiQL.createFetcher({ url: httpUrl, subscriptionUrl: wsUrl });

  function isSubscription(params, options) {
    const document = options && options.documentAST;
    if (!document) return false;
    const operations = document.definitions.filter(function (d) { return d.kind === "OperationDefinition"; });
    const chosen = operations.length === 1 ? operations[0] : operations.find(function (d) {
      return d.name && d.name.value === params.operationName;
    });
    return Boolean(chosen && chosen.operation === "subscription");
  }

  // The token is checked over HTTP before a subscription opens its WebSocket: a refused token closes the socket
  // with 4403, which GraphiQL's WebSocket client retries for about 40 s before it shows anything.
  function checkToken(token) {
    return fetch(httpUrl, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: token },
      body: JSON.stringify({ query: "{ __typename }" }),
    }).then(function (response) {
      if (response.ok) return null;
      return response.json().then(function (body) {
        const message = body && body.errors && body.errors[0] ? body.errors[0].message : "HTTP " + response.status;
        return { errors: [{ message: "The gateway refused the token: " + message + ". Make a new one with  " +
          tokenCommand, extensions: { code: response.status === 403 ? "FORBIDDEN" : "UNAUTHENTICATED" } }] };
      });
    });
  }

  function fetcherFor(token) {
    return function (params, options) {
      if (token === null) return Promise.resolve({ errors: [{ message: NO_TOKEN }] });
      if (!isSubscription(params, options)) return upstream(params, options);
      return checkToken(token).then(function (refusal) {
        return refusal || upstream(params, options);
      });
    };
  }

  const now = new Date();
  const weekAgo = new Date(now.getTime() - 7 * 24 * 3600 * 1000);
  const DEFAULT_QUERY = [
    "# The analytics gateway's GraphiQL: every operation needs a bearer token.",
    "#",
    "# 1. Make a development token in a terminal:",
    "#      " + tokenCommand,
    "# 2. Open the Headers tab below and put it in place of <token ...>:",
    '#      {"Authorization": "Bearer eyJ..."}',
    "#    The schema (Docs, completion) loads as soon as a token is there.",
    "# 3. Run (Ctrl-Enter or the ▶ button).",
    "#",
    "# Subscriptions go over the WebSocket with the same token, e.g.",
    '#   subscription { freshness(orgId: "org_0000") { lastEventAt lastIngestedAt status } }',
    "",
    "query Usage {",
    '  usage(orgId: "org_0000", range: {from: "' + weekAgo.toISOString() + '", to: "' + now.toISOString() + '"},',
    "        granularity: DAY) {",
    "    totals { requests inputTokens outputTokens spend }",
    "    series { start requests spend }",
    "  }",
    "}",
    "",
  ].join("\n");

  function Page() {
    const [token, setToken] = React.useState(function () {
      return tokenOf(storedHeaders());
    });
    const fetcher = React.useMemo(function () {
      return fetcherFor(token);
    }, [token]);
    return React.createElement(GraphiQL, {
      fetcher: fetcher,
      // null: no introspection until there is a token; undefined: introspect (again when the token changes).
      schema: token === null ? null : undefined,
      defaultQuery: DEFAULT_QUERY,
      defaultHeaders: DEFAULT_HEADERS,
      defaultEditorToolsVisibility: "headers",
      isHeadersEditorEnabled: true,
      shouldPersistHeaders: true,
      inputValueDeprecation: true,
      onEditHeaders: function (text) {
        setToken(tokenOf(text));
      },
    });
  }

  ReactDOM.createRoot(root).render(React.createElement(Page));
})();
