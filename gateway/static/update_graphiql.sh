#!/usr/bin/env bash
# Re-download the GraphiQL page's vendored assets from the npm registry (npm pack: the published tarballs, no
# install, no bundler) into gateway/static/graphiql/, with each package's LICENSE. Change a version here, run
# this script, update the table in graphiql/README.md, and commit the files it wrote.
#
# GraphiQL 4.1 is the last major with a UMD build (window.GraphiQL, with graphql-js and the graphql-ws client
# inside); 5.x ships ES modules for a bundler only. Its UMD build wants React 18's UMD builds (React 19 has none).
set -euo pipefail

GRAPHIQL_VERSION=4.1.2
REACT_VERSION=18.3.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/graphiql"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent "graphiql@$GRAPHIQL_VERSION" "react@$REACT_VERSION" "react-dom@$REACT_VERSION" >/dev/null
for package in "graphiql-$GRAPHIQL_VERSION" "react-$REACT_VERSION" "react-dom-$REACT_VERSION"; do
    mkdir -p "${package%-*}"
    tar -xzf "$package.tgz" -C "${package%-*}"
done

mkdir -p "$out"
cp graphiql/package/graphiql.min.js graphiql/package/graphiql.min.css "$out/"
cp graphiql/package/LICENSE "$out/LICENSE.graphiql"
cp react/package/umd/react.production.min.js "$out/"
cp react/package/LICENSE "$out/LICENSE.react"
cp react-dom/package/umd/react-dom.production.min.js "$out/"
cp react-dom/package/LICENSE "$out/LICENSE.react-dom"
(cd "$out" && sha256sum graphiql.min.js graphiql.min.css react.production.min.js react-dom.production.min.js)
