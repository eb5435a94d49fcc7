# kvgate image: `docker build -t kvgate .`
# Build stage: all dependencies, compile TypeScript to dist/.
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
# Scripts off: `prepare` (tsc) needs the sources, so it runs explicitly below; the build stage
# needs no native module.
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
RUN npx tsc -p tsconfig.json

# Runtime stage: production dependencies only, non-root.
FROM node:20-bookworm-slim AS runtime
ENV NODE_ENV=production
WORKDIR /app
COPY package.json package-lock.json ./
# Without dev dependencies there is no tsc, so drop the `prepare` build script before installing
# (native modules such as zeromq still run their install scripts and use their prebuilt binaries).
RUN npm pkg delete scripts.prepare \
    && npm ci --omit=dev --no-audit --no-fund \
    && npm cache clean --force
COPY --from=build /app/dist ./dist
# The node image's unprivileged user (uid 1000); the manifests run as this uid with a read-only root.
USER 1000:1000
EXPOSE 30000 9002 9003
ENTRYPOINT ["node", "dist/cli/main.js"]
CMD ["serve"]
